import VMTemplateOS
/// One `-object memory-backend-file,...` argument, as a value.
///
/// This is the only place that renders the argument: the rules live in `MemoryBackendOptions`, and
/// nothing else assembles the string.
package struct MemoryBackendFile: Sendable, Equatable, Codable {
    package var id: String
    package var path: String
    package var sizeBytes: UInt64
    package var options: MemoryBackendOptions

    package init(id: String = "ram0", path: String, sizeBytes: UInt64, options: MemoryBackendOptions) {
        self.id = id
        self.path = path
        self.sizeBytes = sizeBytes
        self.options = options
    }

    /// The value of `-object`, e.g. `memory-backend-file,id=ram0,mem-path=/t/memory,size=268435456,share=off,readonly=on,rom=off`.
    package func objectArgument() throws -> String {
        try options.validate()
        var properties: [(String, String)] = [
            ("id", id), ("mem-path", path), ("size", String(sizeBytes)),
        ]
        properties += options.renderedProperties
        return QEMUOptionString.render(type: "memory-backend-file", properties)
    }
}
