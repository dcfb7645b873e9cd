"""Worker processes: a receiver in its own process, controlled over ICCP, feeding the parent.

Parent side: `WorkerReceiver` stands in for a receiver with `process = true`. It binds a PAIR
(control) and a PULL (records) in the runtime directory, spawns `daqd serve --controller
ENDPOINT`, waits for READY, configures the worker with REQUEST CONF, and publishes what arrives
on the PULL as if it had received it itself. Run boundaries, `daqctl cmd` and STAT go to the
worker as REQUESTs; stopping is STOP → drain → FINISHED.

Component side: `run_component(controller)` is what `daqd serve --controller` runs: it connects,
sends READY, builds a Host with the one receiver from CONF, routes its records to a PUSH towards
the parent, and on STOP stops receiving, drains, and answers FINISHED.

Records travel as multipart messages [msgpack [source, seq, time_ns, tags], *payload blocks]; a
message whose first frame is empty is a marker (end of a run, end of work) that tells the parent
that every record sent before it has arrived.

Modules: `link` (the wire between the two ends), `parent` (WorkerReceiver), `component`
(`run_component`), `saturnin` (`run_saturnin_component`: the same for a Saturnin controller),
`saturnin_launch` (a script, never imported: starts a Saturnin micro-service for the `saturnin`
receiver with the Python that has saturnin, relaying its control channel over inproc).
"""

from daqd.worker.component import Component, LinkPublisher, run_component
from daqd.worker.link import LINK
from daqd.worker.parent import WorkerReceiver
from daqd.worker.saturnin import SaturninComponent, run_saturnin_component

__all__ = [
    "LINK",
    "Component",
    "LinkPublisher",
    "SaturninComponent",
    "WorkerReceiver",
    "run_component",
    "run_saturnin_component",
]
