fn main() {
    eprintln!("cachetier-sidecar: not implemented yet");
    std::process::exit(2);
}
