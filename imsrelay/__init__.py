"""imsrelay: Microsoft Exchange 5.5's Internet Mail Service, one process per site."""

__version__ = "0.1.0"
