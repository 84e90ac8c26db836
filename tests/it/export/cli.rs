//! `vma-writer export`'s own rules: SIGINT and SIGTERM end it with exit 0
//! after a clean shutdown (socket removed, `stopped` event); the Unix
//! socket is 0600; TCP works; `-d` picks drives; archives that cannot be
//! read at random are refused with a hint to `vma-writer convert`.
