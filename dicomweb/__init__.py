"""DICOMweb (PS3.18): codecs, services, index repository, blob stores."""
