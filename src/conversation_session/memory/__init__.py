"""What the model remembers beyond one prompt: the window (``_window``: trimming that keeps the
prompt's prefix stable), running summaries (``_summary``), and the KV cache kept warm across
turns and restarts (``_kvcache``: the KV file saver and the resume warm-up).
"""
