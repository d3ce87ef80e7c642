"""Erase: closed-form edit, LEACE on conditioning, steering during sampling, sliders and ESD fine-tuning."""
