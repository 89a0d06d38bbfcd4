"""Units of time used across the service, named once (so a literal 86400 never has to be recognised)."""

SECONDS_PER_MINUTE = 60
SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86_400
