"""Everything that speaks a foreign protocol or format.

An adapter turns the outside world into the core's types (and back); it holds no business
decisions. One module per protocol or format.
"""
