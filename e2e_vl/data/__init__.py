"""Task data: readers, samples, collation. Every reader reports unusable input as a `DataError`."""


class DataError(ValueError):
    """Input data that cannot be used as given, found while building a data set (before training starts).

    The message names the file, record or key and how to fix it; tools/train_net.py prints it as one line.
    """
