"""Head families; importing this package registers every head."""
