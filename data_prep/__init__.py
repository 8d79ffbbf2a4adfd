"""Tools that turn raw data into training sets (files plus a manifest), outside the trainer."""
