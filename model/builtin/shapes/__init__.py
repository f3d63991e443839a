"""The built-in ``builtin:shapes`` model: its weights (the diffusers-layout folders beside
this file), the captioned pictures it was trained on (``scenes``), its training
(``train``) and its measurement (``evaluate``). Inference never imports these modules.
"""
