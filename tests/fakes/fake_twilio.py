"""The tests' fake Twilio REST API is the simulator's stand-in (one implementation for both)."""
from callweaver.simulate.twilio_rest import TwilioError, TwilioRequest, TwilioRestStandIn as FakeTwilio

__all__ = ["FakeTwilio", "TwilioError", "TwilioRequest"]
