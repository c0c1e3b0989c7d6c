from serve.model.onednn import cap_isa

# The export's parity checks and its load check run the packages as the server does: oneDNN capped
# at the ISA their weights are packed for (serve/model/onednn.py), as `python -m export` sets it.
cap_isa()
