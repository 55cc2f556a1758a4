"""What a user can get wrong, as error types. The command line prints one line for these and
exits 2 (1 when a run fails on the way, as a full disk makes it); every other exception is a
bug in minisft: exit 3, its traceback logged, but for the machine's own failures
(ENVIRONMENT_ERRNOS: exit 1). Each type keeps the builtin one its callers caught before
(ValueError, FileNotFoundError, ImportError)."""
import errno

# the machine's failures, not the user's nor minisft's: a full disk or quota, an I/O error, a
# read-only file system, no permission, too many open files
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM,
                      errno.EMFILE, errno.ENFILE}


class UserError(Exception):
    """Base: the input, a file, an option or the machine is not as minisft needs it; the
    message names what and the fix."""
    exit_code = 2


class UsageError(UserError, ValueError):
    """An argument or setting that cannot work (with this model, these data, that option)."""


class ModelFileError(UserError, ValueError):
    """A checkpoint's file (config, weights, tokenizer, adapter) that minisft cannot read."""


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the user named, or one that must be inside it, does not exist."""


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed; the message gives the pip command."""


class WriteError(UserError, OSError):
    """A file could not be written (a full disk, a read-only or vanished directory); nothing
    partial was left in its place."""
    exit_code = 1

    def __init__(self, path, error):
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.errno = path, getattr(error, "errno", None)
