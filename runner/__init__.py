"""The runner process: one copy of the model behind one thread. ``route`` (the API workers' call, on the fast path),
``batch_runner`` (batches from the queued calls), ``drain`` (a graceful stop). Knows nothing of HTTP's contract."""
