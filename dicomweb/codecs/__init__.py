"""Pure codecs of the HTTP side of DICOMweb (house style 1): multipart/related, media types and Accept
negotiation, byte ranges, and the STOW-RS request and response bodies."""
