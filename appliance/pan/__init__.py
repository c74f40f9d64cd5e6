"""Card numbers in bytes and text: the detector every outbound path and every record uses.

``detector`` finds primary account numbers (issuer prefix and length table, Luhn, digit
boundaries, single separators) and masks them to what PCI DSS 3.4.1 allows shown;
``scanner`` applies it to values that arrive whole or in windows, through text, JSON and
hex escapes, and scrubs free text. It depends on nothing else of the appliance: the
auditor's standalone verifier ships ``detector`` alone.
"""
