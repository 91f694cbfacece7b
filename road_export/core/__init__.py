"""Layer 1, maths and config: errors, configuration, the rotation maths, names; numpy only (torch only for a torch
tensor handed in)."""
