"""The one training loop that teachers and students share."""
