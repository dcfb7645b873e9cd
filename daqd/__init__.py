"""daqd: an asyncio daemon suite for data acquisition.

The map of daqd/, one line per module or package (receivers/ and publishers/ hold the plug-ins):
  cli           `daqd`: serve, check, dump, demo, sim, export, send-packets (usage errors: one line)
  ctl           `daqctl`: drive a running daemon over its control socket (status, runs, taps)
  daemon        `daqd serve`: host, control socket, live tap, signals and systemd, in one loop
  config        TOML -> validated settings; every error names the file, the table and the key
  config_errors the config errors collected and worded: file, table, key, line, did-you-mean
  tomllines     where each table and key of a TOML text starts, for errors with line numbers
  host          Host: builds receivers and publishers from settings, routes records, reconfigures
  hostruns      HostRuns, the host's run state: transitions, runs begun and ended, judged by counts
  receiver      ReceiverServer, the receivers' base class: records, tasks, commands, supervision
  sockets       ReceiverSockets, a receiver's sockets: UDP (SO_RCVBUF, kernel drops), TCP, ZeroMQ
  hostport      "host:port" in settings (HostPort, parse_hostport) and ZeroMQ bind addresses
  publisher     Publisher, the publishers' base class, and the bounded queue feeding each one
  record        Record: the one thing that flows from receivers to publishers
  runstate      the run state machine (Constellation's satellite states) and what a run carries
  monitor       counters and rates of every receiver and publisher; the status snapshot
  control       the control socket's ICCP server (ZeroMQ ROUTER): requests, STOP, counters
  control_client ControlClient: the blocking ICCP client daqctl, tests and benches use
  endpoints     where control sockets and taps live (runtime dir, ipc paths), who may reach them
  worker/       worker processes: parent side, worker (component), link; Saturnin and its launcher
  constellation/ daqd as a Constellation satellite: CHIRP discovery, CSCP control, CHP, CMDP
  dhs/          the DCSS hardware server: handler API (handlers), devices, engine (Dhs)
  packetstream/ cs.packetstream connections (connection) and `daqd send-packets` (send_packets)
  cdtp_senders  the cdtp receiver's senders: run state, the table bounding them, a run's account
  cdtp_links    the cdtp receiver's links: a PULL socket per transmitter, configured or CHIRP's
  cdtp_runs     the cdtp publisher's settings and runs: BOR (waiting for a receiver), flushes, EOR
  http          HTTP for operation handlers: next image from a receiver, JSON to a service
  web/          the web view: live page, /metrics for Prometheus, run control with a token
  protocols/    sans-IO codecs, one per wire protocol (iccp, dcss, cdtp, chirp, packetstream, ...)
  sim/          peer simulators: DCSS, CDTP, TARGET modules, trigger, timing board, log, monitor
  runfile       run files (msgpack: header, records, end marker): writer helpers and reader
  hdf5          HDF5 run files: the layout (SSDAQ's slow-signal table, one per source) and writer
  export        `daqd export`: a run file converted to the hdf5 publisher's layout or to SOF
  sof           SSDAQ's streamed object files (SOF protocol 1): sans-IO writer, checking reader
  demo          `daqd demo`: bundled config, its control socket, UDP traffic, bounded run files
  render        plain-text tables, sizes, durations and counts for daqctl and daqd demo
  logs          logging set-up (journal-aware) and LimitedLogger, rate-limited per-packet logging
  loghandler    DaqdLogHandler: a logging.Handler sending records to a daqd `log` receiver
  ssdaq_monitor [daemon] monitor_push: receivers' rates as SSDAQ MonitorData, once a second
  trust         owner and mode checks (like sshd's StrictModes): code, configs naming code, sockets
  errors        the exceptions daqd raises on purpose, each with a message a user can act on
  deadline      the shutdown deadline every draining part shares; a second signal cuts it short
  eager         eager tasks: a coroutine's first step runs at once, inside its task
  netinfo       who holds an address daqd could not bind (/proc/net -> /proc/PID/fd)
  systemd       sd_notify without libsystemd: READY, STATUS, WATCHDOG, STOPPING
"""

__version__ = "0.1.0"
