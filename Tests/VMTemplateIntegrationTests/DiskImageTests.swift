import Foundation
import Testing

@testable import VMTemplateOS
@testable import VMTemplateQEMU

#if canImport(Glibc)
import Glibc
#endif

/// The qcow2 overlays vmtemplate writes itself, checked by QEMU's own tool, and the checks on
/// images a clone is given.
@Suite("disk images", .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img"), "needs qemu-img: run scripts/setup"))
struct DiskImageTests {
    @Test("an overlay is what qemu-img would make: the same header fields, refcounts and L1 table, and qemu-img check finds no error", arguments: [
        (UInt64(1 << 20), DiskFormat.raw), (UInt64(64 << 20), .qcow2), (UInt64(3) << 40, .raw), (UInt64(1000), .raw), (UInt64(1) << 46, .qcow2),
    ])
    func overlayMatchesQEMUImg(size: UInt64, format: DiskFormat) throws {
        let images = try TestImages()
        defer { images.remove() }
        let base = format == .raw ? images.raw : images.qcow2
        let ours = "\(images.directory)/ours.qcow2"
        let theirs = "\(images.directory)/theirs.qcow2"
        let bytes = try QCOW2Overlay(sizeBytes: size, backingFile: base, backingFormat: format).bytes()
        try Data(bytes).write(to: URL(fileURLWithPath: ours))
        try Shell.run("qemu-img create -q -f qcow2 -u -b \(base) -F \(format.rawValue) \(theirs) \(size)")
        let reference = [UInt8](try Data(contentsOf: URL(fileURLWithPath: theirs)))
        #expect(bytes.count == reference.count, "file size")
        // The fixed header (qemu-img adds a feature-name table after it, which is optional).
        #expect(Array(bytes[0..<8]) == Array(reference[0..<8]))
        #expect(Array(bytes[16..<104]) == Array(reference[16..<104]), "fields from backing_file_size to header_length")
        #expect(Array(bytes[65536...]) == Array(reference[65536...]), "refcount table, refcount block and L1 table")
        let info = try Shell.run("qemu-img info --output=json \(ours)")
        #expect(info.contains("\"backing-filename\": \"\(base)\""), "\(info)")
        #expect(info.contains("\"backing-filename-format\": \"\(format.rawValue)\""), "\(info)")
        #expect(info.contains("\"virtual-size\": \((size + 511) / 512 * 512)"), "\(info)")
        #expect((try? Shell.run("qemu-img check -q \(ours)")) != nil, "qemu-img check finds errors")
    }

    @Test("images vmtemplate will not give a clone: through a symlink, a FIFO, qcow2 as raw, a qcow2 with a backing file, an external data file or encryption")
    func refusedImages() throws {
        let images = try TestImages()
        defer { images.remove() }
        func refused(_ path: String, _ format: DiskFormat, saying expected: String) {
            do {
                let image = try DiskImage.open(path: path, format: format, writable: false)
                close(image.descriptor)
                Issue.record("\(path) was accepted")
            } catch {
                #expect("\(error)".contains(expected), "\(path): \(error)")
            }
        }
        symlink(images.raw, "\(images.directory)/link.raw")
        refused("\(images.directory)/link.raw", .raw, saying: "symbolic link")
        mkfifo("\(images.directory)/fifo", 0o600)
        refused("\(images.directory)/fifo", .raw, saying: "not a regular file")
        refused(images.qcow2, .raw, saying: "pass format=qcow2")
        refused(images.raw, .qcow2, saying: "is not a qcow2 image")
        refused(images.backed, .qcow2, saying: "backing file of its own")
        let external = "\(images.directory)/external.qcow2"
        try? Shell.run("qemu-img create -q -f qcow2 -o data_file=\(images.directory)/data.raw \(external) 1M")
        refused(external, .qcow2, saying: "external file")
        let encrypted = "\(images.directory)/encrypted.qcow2"
        try? Shell.run("qemu-img create -q --object secret,id=s0,data=x -f qcow2 -o encrypt.format=luks,encrypt.key-secret=s0 \(encrypted) 1M")
        refused(encrypted, .qcow2, saying: "encrypted")
        let image = try DiskImage.open(path: images.qcow2, format: .qcow2, writable: false)
        close(image.descriptor)
        #expect(image.virtualSizeBytes == 2 << 20)
    }
}
