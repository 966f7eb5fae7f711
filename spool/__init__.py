"""The spool: durable local segment files between the collector and the shipper (ADR 28).

Both sides depend down on this package: the collector appends (`segments.SpoolWriter`,
`async_writer.AsyncSpool`) and publishes each open segment's acknowledged-durable length
(`watermark`, ADR 56), the shipper reads sealed segments and open ones up to that length, and
recovers orphans (`segments`, `recovery`). It imports only `core`.
"""
