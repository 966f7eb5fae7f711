"""The spool: durable local segment files between the collector and the shipper (ADR 28).

Both sides depend down on this package: the collector appends (`segments.SpoolWriter`,
`async_writer.AsyncSpool`), the shipper reads sealed segments and recovers orphans
(`segments`, `recovery`). It imports only `core`.
"""
