"""leader-edge: LLM-distilled medication recommendation that runs at the bedside.

The core package never imports torch at module level, so `leader-edge predict` starts fast.
"""

__version__ = "0.1.0"
