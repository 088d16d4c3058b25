import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// One template, as `list --json` and the API's `GET /v1/templates` show it (its full manifest is
/// `inspect --json`'s): what a runtime needs to choose one and what an operator needs to see.
public struct TemplateView: Sendable, Codable, Equatable {
    public var name: String
    public var memoryBytes: UInt64
    public var machineType: String
    public var accelerator: String
    public var hotplugSlots: Int
    public var guestClock: String
    public var qemuVersion: String
    public var createdAt: Date
    /// Its clones that have not exited (warm pool members included).
    public var clones: Int
    /// Files of the template that are gone (it cannot be cloned until made again).
    public var missingFiles: [String]
    /// Where a pulled or imported template came from (its reference and manifest digest); nil for
    /// one made here.
    public var origin: Origin?

    public struct Origin: Sendable, Codable, Equatable {
        public var reference: String
        public var digest: String
    }

    public init(_ template: PublishedTemplate, clones: Int, missingFiles: [String]) {
        let manifest = template.manifest
        name = manifest.name
        memoryBytes = manifest.machine.memoryBytes
        machineType = manifest.machine.machineType
        accelerator = manifest.machine.accelerator.rawValue
        hotplugSlots = manifest.machine.hotplugSlots
        guestClock = (manifest.guestClock ?? .none).rawValue
        qemuVersion = manifest.qemu.version.description
        createdAt = manifest.createdAt
        self.clones = clones
        self.missingFiles = missingFiles
        origin = manifest.origin.map { Origin(reference: $0.reference, digest: $0.digest) }
    }

    enum CodingKeys: String, CodingKey {
        case name, accelerator, clones, origin
        case memoryBytes = "memory_bytes"
        case machineType = "machine_type"
        case hotplugSlots = "hotplug_slots"
        case guestClock = "guest_clock"
        case qemuVersion = "qemu_version"
        case createdAt = "created_at"
        case missingFiles = "missing_files"
    }
}
