"""daqd as a Constellation satellite (only with a [constellation] table).

satellite   the satellite `Daqd.<name>`: its sockets, CHIRP offers and CHP heartbeats over the host
commands    CSCP: requests answered, the standard commands, transitions, receivers' cmd_ as commands
autonomy    the other satellites' heartbeats and CHP's rules for when one fails
monitoring  CMDP: log lines and metrics published to Constellation listeners
discovery   CHIRP discovery for one host: its beacons and its group's registry
"""

from daqd.constellation.satellite import Satellite, start_satellite

__all__ = ["Satellite", "start_satellite"]
