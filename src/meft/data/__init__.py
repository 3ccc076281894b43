"""Training data: records and their encoding with chat templates, the built-in knowledge sets,
and the general questions and text behind the retention probe."""
