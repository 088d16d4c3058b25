import VMTemplateOS

/// How device state reaches its file: the one place that chooses between QEMU's `file:` URI and
/// a shell pipe.
public enum MigrationTransport: String, Sendable, Codable {
    /// `file:PATH` (QEMU >= 8.2): QEMU reads and writes the file itself.
    case file
    /// `exec:cat`: older QEMUs, through `/bin/sh`.
    case exec

    /// The best transport this QEMU has.
    public init(capabilities: QEMUCapabilities) {
        self = capabilities.supportsFileMigration ? .file : .exec
    }

    /// The `migrate` URI that saves the state to `path`.
    public func saveURI(to path: String) -> String {
        switch self {
        case .file: "file:\(path)"
        case .exec: "exec:cat > \(ShellQuote.quote(path))"
        }
    }

    /// The `migrate-incoming` URI that loads the state from `path`.
    public func loadURI(from path: String) -> String {
        switch self {
        case .file: "file:\(path)"
        case .exec: "exec:cat \(ShellQuote.quote(path))"
        }
    }
}
