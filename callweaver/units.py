"""Units of time used across the service, named once (so a literal 86400 never has to be recognised), and the
longest a call can last."""

SECONDS_PER_MINUTE = 60
SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86_400

# Twilio's own ceiling (and default) for a call's TimeLimit: no call lasts longer (config caps MAX_CALL_DURATION_S
# with it; retention takes a call whose end was never recorded once this has passed).
MAX_CALL_DURATION_LIMIT_S = 4 * SECONDS_PER_HOUR
