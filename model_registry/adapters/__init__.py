"""What talks to the outside: the database, files, storage and the training/serving backends."""
