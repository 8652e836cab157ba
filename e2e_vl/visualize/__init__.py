"""Pictures and analyses of what a trained model sees: regions, answers, attention, grounding, curves."""
