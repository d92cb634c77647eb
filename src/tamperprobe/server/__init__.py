"""The reference model server: a classifier behind the Open Inference Protocol (KServe v2 REST).

``holder.py`` holds the served model (swappable at run time) and infers its input spec;
``repository.py`` holds what is served (one model, or a Triton-style model repository whose models
load on first use); ``infer.py`` checks an inference request and builds the response; ``app.py`` is the ASGI
application and its routes, ``serve`` (the ``serve`` command) and ``ServerThread`` (tests and
the demo). The protocol's rules are ``tamperprobe.oip``'s, shared with the ``kserve`` client.
"""
