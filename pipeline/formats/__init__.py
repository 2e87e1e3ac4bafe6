"""The contracts between stages (DESIGN.md): what one stage writes and the next reads.

``shards`` (webdataset members and the checked tar reader), ``samples`` (decoding one raw sample
into the preprocessed columns), ``preprocessed`` (the data contract preprocess records beside its
output), ``tokens`` (the token dataset) and ``checkpoint`` (the tokenizer directory and training
state). Stages import these and never each other; nothing here imports a stage or Ray.
"""
