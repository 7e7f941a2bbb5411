//! A WASI command: a valid component, but of another world than rewind's.

fn main() {
    println!("I am a command, not a rewind processor");
}
