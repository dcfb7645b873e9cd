"""The exceptions daqd raises on purpose: each carries a message a user can act on."""


class DaqdError(Exception):
    """Base of every error daqd raises deliberately."""


class ProtocolError(DaqdError):
    """Bytes or frames from a peer that do not follow the wire format; says what and where."""


class ConfigError(DaqdError):
    """A configuration that cannot be used; the message names the file, the table and the key."""


class ControlError(DaqdError):
    """A control request that was refused or could not be delivered."""
