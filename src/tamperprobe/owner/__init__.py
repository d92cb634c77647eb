"""Owner side (white-box): everything that needs the real weights.

``methods`` generate candidate markers (one module per method, registered by name);
``selection`` keeps a few of them (MANC or random); ``generate.generate_fingerprint`` runs both,
records the intact outputs and says how it chose (``create_fingerprint``: the fingerprint alone). ``sensitivity`` is VerIDeep's weight sensitivity, which the
``sensitive`` method climbs; ``markers`` holds the helpers methods share (natural seeds, the
8-bit domain, image metrics, margin checks). ``calibrate`` measures how much benign runtimes
move the logits and derives the boundary margin δ from it; ``budget`` turns a flip probability
into a query budget and checks a fingerprint against simulated tamperings.
"""
