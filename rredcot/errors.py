"""Errors a user can fix. The CLI prints them as one paragraph and exits with status 2."""


class UserError(Exception):
    """Bad config, data or command line: the message names the problem and the fix."""

    exit_code = 2
