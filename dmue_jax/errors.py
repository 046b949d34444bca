"""The one base class for problems a user can fix (bad config, missing data, bad checkpoint).

Commands catch `UserError`, print its message and exit non-zero without a traceback; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input; the message names it and the fix."""
  exit_code = 1


class DatasetError(UserError):
  """The dataset cannot be loaded; the message names what is missing and how to get it."""
  exit_code = 2
