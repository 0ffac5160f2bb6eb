"""Exit codes of the commands that talk to a server (`send`, `listen`, `chat`,
`publish`, `notify`, `disconnect`): one per kind of failure, whichever command.
2 is argparse's (and `serve`'s) usage or settings error."""

from typing import Final

OTHER_ERROR: Final = 1
UNREACHABLE: Final = 3  # no server at the URL
REFUSED: Final = 4  # a token (4401) or an API key (401) refused
FORBIDDEN: Final = 5  # a room the token does not permit (4403)
INVALID_ROOM: Final = 6
API_OFF: Final = 7  # the server's HTTP API is off (API_KEY unset: 404)
INTERRUPTED: Final = 130
BROKEN_PIPE: Final = 141  # the reader of stdout went away: 128 + SIGPIPE, as a shell reports
