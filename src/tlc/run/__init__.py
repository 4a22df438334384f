"""The compression loop shared by every method: settings, resume state, step records, data helpers."""
