"""What both daemons stand on: the raw-ASGI toolkit, serving, error envelopes,
the OpenAI request schema and token counting. Neither cortex nor neuron
imports the other; both import this."""
