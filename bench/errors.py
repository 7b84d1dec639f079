class UserError(Exception):
    """A mistake the user can fix (bad config, missing data or weights): exit code 2, one line."""
