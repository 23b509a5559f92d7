"""FlexAttention mask_mods, score_mods and BlockMask builders, one pattern per file."""
