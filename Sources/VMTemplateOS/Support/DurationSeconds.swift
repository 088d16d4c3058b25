extension Duration {
    /// The duration in seconds, as a floating-point number.
    public var seconds: Double {
        let (whole, fraction) = components
        return Double(whole) + Double(fraction) / 1e18
    }

    /// Seconds given as a floating-point number (options such as `--timeout 2.5`), clamped to
    /// 0 ... 10^9 s; NaN is 0. Never traps, whatever a file or a command line says.
    public static func seconds(fractional value: Double) -> Duration {
        guard value.isFinite, value > 0 else { return .zero }
        return .milliseconds(Int64((min(value, 1e9) * 1000).rounded()))
    }

    /// "250 ms", "5 s", "1.5 s": for messages.
    public var shortText: String {
        let (seconds, attoseconds) = components
        let milliseconds = seconds * 1000 + attoseconds / 1_000_000_000_000_000
        if milliseconds < 1000 { return "\(milliseconds) ms" }
        if milliseconds % 1000 == 0 { return "\(milliseconds / 1000) s" }
        return "\(Double(milliseconds) / 1000) s"
    }
}
