"""Export a trained model to the inference format users load, with its model card, and publish it."""
