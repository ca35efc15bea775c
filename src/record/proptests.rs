//! Property tests over record decoding and name/header validation.
