import Foundation

/// Single-quotes a string for `/bin/sh` (the `exec:` migration URI runs a shell command).
public enum ShellQuote {
    public static func quote(_ text: String) -> String {
        "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }
}
