//! convert (todo)
