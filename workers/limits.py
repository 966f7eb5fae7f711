"""The workers' batch bound, in a module that imports nothing: workers/kafka_io.py (imported by `tally up` before
it sets up the metrics' multiprocess directory) reads it without importing the writer and its metrics."""

# Records (events, set-aside records) in one write at most. A poll adds to the batch being gathered before this is
# checked, so a poll must stay within it too (workers/kafka_io.py `records_per_poll`): the write in flight and the
# batch gathered then stay under 2 x MAX_BATCH decoded events each, whatever the lag.
MAX_BATCH = 25_000
