"""daqd: an asyncio daemon suite for data acquisition."""

__version__ = "0.1.0"
