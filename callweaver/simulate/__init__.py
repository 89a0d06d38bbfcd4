"""Local call simulator: plays Twilio against a running CallWeaver — no phone, no Twilio account.

`python -m callweaver.simulate --help`. The tests' scripted caller is this same code.
"""
from .caller import RelayCaller, RelayTwiml, Reply
from .twilio_rest import TwilioRestStandIn
from .webhooks import TwilioWebhooks, http, new_call_sid, twilio_signature

__all__ = ["RelayCaller", "RelayTwiml", "Reply", "TwilioRestStandIn", "TwilioWebhooks", "http",
           "new_call_sid", "twilio_signature"]
