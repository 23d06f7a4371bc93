"""`cloudbot`: the control plane's REST API from a terminal. It speaks only the public API
(the same any program uses) and keeps no secret but a personal access token, in a file only
its owner can read."""
