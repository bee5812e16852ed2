"""Browser tests of the web playground."""
